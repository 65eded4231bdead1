"""The one exception type users see.

Every failure caused by the user's input (a config key, a data path, an S3
endpoint, a checkpoint) raises a subclass of :class:`VaeTrainError` whose message
names the cause and the fix. The CLI prints that message alone and exits with
status 2, so users never have to read a traceback from deep inside torch.
"""


class VaeTrainError(Exception):
    """A user-facing error: the message is the whole explanation."""
