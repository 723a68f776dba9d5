"""Thin I/O around the kernel: ``k8s`` (the API server), ``cloudhypervisor`` (the VMM API
socket), ``webhook`` (admission over HTTPS) and ``pki``. Imported by :mod:`apps` and the test
bench; the three adapters are independent of each other and never import the test bench."""
