"""Helpers every fedscan package may import (it imports no other project package)."""
