"""Fault injection for chscale (issue 7, ADR 0008).

- :mod:`testbed.faults.schedule`: seeded, replayable fault schedules as plain data;
- :mod:`testbed.faults.proxy`: a loopback HTTP proxy in front of the API server that injects
  API errors and timeouts and delays, duplicates, reorders or drops watch events;
- :mod:`testbed.faults.checker`: continuous checks of RESIZE.md §8 against the real API
  server and the VMM sockets;
- :mod:`testbed.faults.runner`: a local stack behind the proxies, a pool of VMs, and the
  loop that plays schedules and reports;
- :mod:`testbed.faults.fuzz`: malformed VirtualMachine objects written past admission.
"""
