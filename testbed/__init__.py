"""The test bench: what stands in for a cluster on one machine, and never ships.

The control plane built from the Go module proxy (:mod:`testbed.controlplane`), the
simulated kubelet (:mod:`testbed.kubelet`), the Cloud Hypervisor simulator
(:mod:`testbed.chsim`), the local stack that runs them with chscale's own components
(:mod:`testbed.localstack`) and the fault harness (:mod:`testbed.faults`). Tests, benchmarks
and the CLI's ``up``/``demo``/``simulate`` import it; the controller, daemon and webhook
may not (an import-linter contract in ``make lint`` enforces it).
"""
