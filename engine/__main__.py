"""``python -m stunet``: the ``stunet`` program, for environments without the console script on PATH."""
from .cli import run

run()
