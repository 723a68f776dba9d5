"""Fault injection for chscale (issue 7, ADR 0008).

- :mod:`apps.faults.schedule`: seeded, replayable fault schedules as plain data;
- :mod:`apps.faults.proxy`: a loopback HTTP proxy in front of the API server that injects
  API errors and timeouts and delays, duplicates, reorders or drops watch events;
- :mod:`apps.faults.checker`: continuous checks of RESIZE.md §8 against the real API
  server and the VMM sockets;
- :mod:`apps.faults.runner`: a local stack behind the proxies, a pool of VMs, and the
  loop that plays schedules and reports;
- :mod:`apps.faults.fuzz`: malformed VirtualMachine objects written past admission.
"""
