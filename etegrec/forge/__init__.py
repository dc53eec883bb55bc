"""FORGE and item-code assignment: ``assign_codes`` (pure numpy) and ``get_code`` (runs the tokenizer)."""
from __future__ import annotations

from etegrec.forge.assign import CodeAssignment, CodeOverflowError, assign_codes
from etegrec.forge.get_code import ItemCodes, get_code

__all__ = ["CodeAssignment", "CodeOverflowError", "ItemCodes", "assign_codes", "get_code"]
