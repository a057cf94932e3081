"""Passes: one file each, pure ``Model -> Model`` functions (see edgec.core.pass_manager)."""
