"""Pure models of the kubelet, Cloud Hypervisor and a whole cluster, for the test bench and
the simulations; no I/O. Only :mod:`testbed`, the CLI's ``simulate``, benchmarks and tests
may import them: what ships to a cluster never does."""
