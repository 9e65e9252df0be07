"""One family of user-facing errors. The CLI prints ``str(error)`` as one line and exits 2.

Every message names the field (tensor, file, argument), the value it got and what was expected.
``assert`` stays for invariants of posterrt's own code.
"""


class PosterRTError(Exception):
    """Base of every error a user can act on."""


class ContractError(PosterRTError):
    """A tensor does not match a model's I/O contract."""


class BundleError(PosterRTError):
    """A bundle folder is missing a file, was edited, or was exported for another contract version."""


class CheckpointError(PosterRTError):
    """A checkpoint file is missing, corrupt, or does not fit the config."""


class InputError(PosterRTError):
    """A CLI argument, image, mask or text is not acceptable."""


class BackendError(PosterRTError):
    """A backend (ONNX Runtime, Triton) could not run a model."""


class ParityError(PosterRTError):
    """An exported or optimized model does not match its reference within tolerance."""


class StoreError(PosterRTError):
    """An object store cannot be reached, refuses the credentials, lacks the bucket or holds no
    complete repository; or a push to it stopped half-way."""


class DeadlineExceeded(PosterRTError):
    """A request's ``timeout`` passed before it finished; names the stage and the step it reached."""

    def __init__(self, message: str, stage: str | None = None, step: int | None = None, total: int | None = None):
        super().__init__(message)
        self.stage, self.step, self.total = stage, step, total


class RequestCancelled(PosterRTError):
    """A request was cancelled (``PosterJob.cancel``, an asyncio task cancelled, Ctrl-C) before it finished."""

    def __init__(self, message: str, stage: str | None = None, step: int | None = None, total: int | None = None):
        super().__init__(message)
        self.stage, self.step, self.total = stage, step, total
