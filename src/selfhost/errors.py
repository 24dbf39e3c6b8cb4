"""Errors a user or client can cause.

Every error here carries a message that names the offending value and what
would have been accepted. The CLI prints it as one line and exits non-zero; the
server turns it into an OpenAI-shaped 4xx response.
"""


class SelfhostError(Exception):
    """Base class of every error a user can cause and fix."""


class ModelNotFoundError(SelfhostError):
    """A model reference that is neither a usable folder nor a reachable Hub id."""


class UnsupportedModelError(SelfhostError):
    """A checkpoint whose architecture or weight format selfhost will not run."""


class InvalidParameterError(SelfhostError, ValueError):
    """A sampling, engine or command parameter outside its valid range.

    `param` names the request field at fault when there is one ("prompt",
    "max_tokens", ...), so a server can point at it without reading the message.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParameterError):
    """A prompt, or a prompt plus the tokens asked for, that does not fit the context window or the KV cache."""


class CollectionNotFoundError(SelfhostError):
    """A RAG collection name that the vector store does not hold."""
