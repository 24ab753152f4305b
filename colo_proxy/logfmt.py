"""`--log-format json`: one JSON object per log line, for log shippers."""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """time (RFC 3339, UTC), level, logger, message, and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text", text_format: str = TEXT_FORMAT) -> None:
    """Configure the root logger in text or JSON, as logging.basicConfig would.

    Like basicConfig, a root logger that already has handlers (an embedding
    program, pytest's capture) keeps them; only the level is set.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
        root.addHandler(handler)
    root.setLevel(level.upper())
