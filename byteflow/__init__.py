"""ByteFlow Net adapter and its coding-rate scores. Importing the package (the
`harness.adapters` entry point `byteflow`) registers the adapter."""

from byteflow import model  # noqa: F401  (registers "byteflow")
