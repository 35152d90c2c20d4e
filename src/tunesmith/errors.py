"""One error family: every message says where (file:line or config field), what was expected, what to do."""


class TunesmithError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class ConfigError(TunesmithError):
    pass


class DataError(TunesmithError):
    pass


class ModelError(TunesmithError):
    pass


class OutputDirError(TunesmithError):
    pass
