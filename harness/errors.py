"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class HarnessError(Exception):
    """Bad input (suite file, corpus, checkpoint, option) described in one line."""
