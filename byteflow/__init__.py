"""ByteFlow Net adapter and its coding-rate chunker."""
