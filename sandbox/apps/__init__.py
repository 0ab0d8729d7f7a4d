"""The application runtime of the sandbox: app pods run as local processes (see runtime.py).

Source: the behaviour played is the kubelet's (kubernetes/kubernetes pkg/kubelet: kuberuntime, prober, v1.35),
the API server's service proxy (pkg/registry/core/service/storage, apimachinery pkg/util/proxy upgradeaware.go)
and busybox wget (upstream busybox networking/wget.c, 1_36_1); each module cites its own paths. Where a behaviour
is not modelled (sandbox/REALITY.md, "App pods beyond Python") the pod fails or the request is refused, never
passes: a stand-in at least as strict as the cluster.
"""
