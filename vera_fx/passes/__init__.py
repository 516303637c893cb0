"""Graph passes: match, inject (which shares and lowers what it emits), merge / unmerge, and their pipeline."""

from .inject import InjectPass
from .match import MatchPass, select_sites
from .merge import MergePass, UnmergePass

__all__ = ["MatchPass", "InjectPass", "select_sites", "MergePass", "UnmergePass"]
