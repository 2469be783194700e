"""The chaos suite: many instances under injected faults, then proof that nothing was lost or doubled."""
