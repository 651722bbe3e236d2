"""Exceptions a user can cause. The CLI prints their message as one line and exits non-zero."""


class MistralNemoError(Exception):
    """Base of every error caused by user input: files, flags, requests."""


class ConfigError(MistralNemoError, ValueError):
    """A model config that is missing, malformed or describes an impossible shape."""


class CheckpointError(MistralNemoError):
    """A checkpoint folder or file that cannot be read or written as asked."""


class InvalidRequestError(MistralNemoError, ValueError):
    """A request (prompt, chat messages, tools, sampling settings) that breaks a rule."""
