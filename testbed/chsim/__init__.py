"""The Cloud Hypervisor simulator process (``chscale-ch-sim``)."""
