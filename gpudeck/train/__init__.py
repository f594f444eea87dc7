"""Code that runs inside the ranks of a job.

``python -m gpudeck.train.run SCRIPT ARG...`` (started by torchrun) runs a user's unmodified script,
counts the bytes each rank hands to torch.distributed and reports them to the node agent in the
datagram of :mod:`gpudeck.protocol.traffic`. This package never imports the agent, the coordinator
or the TUI.
"""
