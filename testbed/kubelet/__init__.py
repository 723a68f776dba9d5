"""chscale-kubelet: a simulated kubelet (node agent) with faithful in-place resize."""
