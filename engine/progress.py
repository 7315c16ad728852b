"""What a user sees of stunet's work: a progress line over a long job's stages (an export, a TensorRT build, a
checkpoint conversion), and libraries' loggers kept to what matters while they talk about themselves."""
from __future__ import annotations

import logging
from contextlib import contextmanager


@contextmanager
def loggers_quiet(level: int, *names: str):
    """The loggers ``names`` pass only records of ``level`` and above while the block runs; their own levels come
    back after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, before in zip(loggers, levels):
            logger.setLevel(before)


class Stages:
    """A progress line over a job's stages, naming the one that runs and the time so far: an AOTInductor
    compile, a TensorRT build or the loading of a large checkpoint is otherwise silent for minutes.
    ``enabled=False`` shows nothing."""

    def __init__(self, what: str, names: list[str], enabled: bool):
        from tqdm.auto import tqdm

        self.what, self.names = what, names
        self._bar = tqdm(total=len(names), desc=what, disable=not enabled, bar_format="{desc} [{elapsed}]")

    @contextmanager
    def stage(self, name: str):
        self._bar.set_description_str(f"{self.what}: {name} ({self._bar.n + 1}/{len(self.names)})")
        yield
        self._bar.update(1)

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None:
            self._bar.set_description_str(f"{self.what}: done", refresh=False)
        self._bar.close()
