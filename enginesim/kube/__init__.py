"""An emulated Kubernetes API server for tests and benchmarks (no real apiserver runs here).

It speaks the real wire format for the subset Switchyard uses (discovery, namespaces, Pods
list/watch, Deployments and their ``scale`` subresource, coordination.k8s.io Leases) and
"runs" Deployments: each pod whose template names an enginesim profile is backed by a
simulated engine in this process. See docs/kube-sim.md.

Modules: ``errors`` (Status objects), ``selectors`` and ``patch`` (pure), ``resources``
(the served resource table and discovery documents), ``store`` (objects, resourceVersion,
watch history), ``faults`` (the fault knobs), ``tables`` (kubectl's Table responses),
``controller`` (Deployment -> pods -> engines), ``routes`` (HTTP), ``kubeconfig``,
``server`` (wiring).
"""
