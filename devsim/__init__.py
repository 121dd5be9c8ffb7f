"""A protocol-true device simulator: N simulated devices in one process, one paho client each, one epoll loop.

Workflow (`slmops sim`, `Simulator`):
- `devsim.accounts`: each device's id and broker credentials (a CSV file, a pattern, or none);
- `devsim.gate`: every deploy and cancel command is checked the way `agent.commands.CommandGate` does (a threshold
  of the trust root's commands keys, the root version, seq above the last accepted, the bundle origin), held in
  memory instead of on disk;
- `devsim.device`: one device's behaviour: retained presence online and the offline last will, the update reports
  in the agent's order with simulated step durations (nothing is downloaded), a finished deployment answered with
  its terminal report again, superseded and cancelled commands answered like the agent, optional telemetry;
- `devsim.behaviour`: the knobs (durations, failure and silence rates, a bundle every device fails, eval scores);
- `devsim.loop`: the one epoll loop driving every paho client through its socket callbacks, plus timers, paced
  connects spread over 127.0.0.x source addresses, and reconnects;
- `devsim.sim`: builds the devices, runs the loop, counts everything (`Stats`) and writes the summary.
Imports protocol/, mqttlink/ and paho only.
"""

from .behaviour import Durations, Knobs
from .sim import Simulator, Stats

__all__ = ["Durations", "Knobs", "Simulator", "Stats"]
