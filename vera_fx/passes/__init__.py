"""Graph passes, one per file: match, inject, share, merge / unmerge (and the pipeline that composes them)."""

from .inject import InjectPass
from .match import MatchPass, select_sites
from .merge import MergePass, UnmergePass
from .share import SharePass

__all__ = ["MatchPass", "InjectPass", "select_sites", "MergePass", "UnmergePass", "SharePass"]
