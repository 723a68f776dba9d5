"""A real node for the local stack: containerd and runc from Debian's packages, the
kubelet built in :mod:`testbed.controlplane.build`, images built locally (ADR 0014)."""
