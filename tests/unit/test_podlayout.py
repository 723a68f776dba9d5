import pytest

from core.podlayout import PodLayoutError, vmm_socket_in_pod, vmm_socket_path


def test_vmm_socket_path_mirrors_the_kubelet_pods_directory():
    path = vmm_socket_path("/var/lib/chscale/kubelet/pods/", "0f3c")
    assert path == "/var/lib/chscale/kubelet/pods/0f3c/volumes/kubernetes.io~empty-dir/vmm/ch.sock"
    for bad in ("", "..", "a/b"):
        with pytest.raises(PodLayoutError):
            vmm_socket_path("/pods", bad)
    with pytest.raises(PodLayoutError):
        vmm_socket_path("", "0f3c")


def test_the_pod_and_the_node_name_the_same_socket():
    assert vmm_socket_in_pod().rsplit("/", 1)[1] == vmm_socket_path("/p", "u").rsplit("/", 1)[1]
