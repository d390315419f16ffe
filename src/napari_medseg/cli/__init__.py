"""``medseg``, the command line: a module a verb (predict, predict_slides, evaluate, convert, train,
checkpoints for average and info, tune, apps for demo and web), their options in ``parser``, the
entry in ``entry``. Each verb parses, calls one core function and prints; nothing here computes."""

from .entry import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
