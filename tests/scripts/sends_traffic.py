"""A command job that reports parameter-sync traffic the way a rank's reporter does (one cumulative
datagram to the agent's sink), without torch, then stays running until it is cancelled."""

import os
import socket
import time

from gpudeck.protocol.traffic import TrafficReport, encode_report

host, _, port = os.environ["GPUDECK_TRAFFIC_ADDR"].rpartition(":")
report = TrafficReport(job=int(os.environ["GPUDECK_JOB_ID"]), attempt=int(os.environ["GPUDECK_ATTEMPT"]), rank=0,
                       bytes={"all_reduce": 4096, "send": 24})
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    while True:
        sock.sendto(encode_report(report), (host, int(port)))
        time.sleep(0.5)
