"""Errors that finegrain reports to the user as a message, not a traceback."""


class FinegrainError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class DataError(FinegrainError):
    """The dataset on disk is malformed: a missing file, an unresolved id, an empty class ..."""


class BadImageError(DataError):
    """An image file cannot be decoded (unreadable, truncated or not an image)."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.reason = reason
        # The DataLoader re-raises worker errors as ``type(exc)(message)``: accept a single string too.
        if reason:
            message = (
                f"cannot read image '{path}': {reason}. "
                "Run `finegrain data check` on the dataset to list every bad file, "
                "fix or remove them, or pass --skip-bad to train without them."
            )
        else:
            message = path
        super().__init__(message)


class NotAnImageError(BadImageError):
    """The file is not in an image format Pillow can read."""


class ImageTooLargeError(BadImageError):
    """The image has more pixels than allowed (decompression bombs included); refused before decoding."""


class ConfigError(FinegrainError):
    """An option or configuration value is invalid."""


class CheckpointError(FinegrainError):
    """A checkpoint or weights file is missing or cannot be used."""


class ExportError(FinegrainError):
    """An exported model would not be what it claims (e.g. int8 that disagrees with fp32)."""


class DiskFullError(FinegrainError):
    """A write ran out of disk space; the previous version of the file is intact."""

    def __init__(self, path, mount, needed_bytes: int, free_bytes: int) -> None:
        need = f"needs ~{max(needed_bytes, 1 << 20) / 2**20:,.0f} MB, " if needed_bytes else ""
        super().__init__(
            f"no space left on {mount} writing '{path}' ({need}{free_bytes / 2**20:,.1f} MB free): "
            "free some space or write elsewhere (--run-dir, --cache-dir, --out), then run again"
        )
