"""The gpudeck dashboard (Textual). `gpudeck.tui.app.GpudeckApp` is the app; `gpudeck.tui.client` does
all of its network I/O; `gpudeck.tui.model` is its state, testable without a terminal."""
