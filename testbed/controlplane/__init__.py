"""The real control plane for tests and the local stack: kube-apiserver and etcd built
from the Go module proxy (``testbed.controlplane.build``) and run on loopback
(``testbed.controlplane.launcher``). See ADR 0002.

Nothing is imported here, so that ``python -m testbed.controlplane.build`` neither pays for
the kubernetes client nor runs a module twice.
"""
