"""Running cases: launchers (inline, one process per case, torchrun), preflight, progress, scale-out."""
