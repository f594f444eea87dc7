"""gpudeck: run a small GPU cluster from a terminal.

This package is the shared kernel that every part imports: the wire protocol, configuration and
paths, discovery, and the `gpudeck` command. The parts live in sibling packages (`gpudeck.agent`,
`gpudeck.coordinator`, `gpudeck.tui`, `gpudeck.train`) that never import one another.
"""

__version__ = "0.1.0"
