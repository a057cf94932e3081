"""Passes: one file each, pure ``Model -> Model`` functions (see edgec.manager)."""
