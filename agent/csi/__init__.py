"""The CSI node plugin (driver ``csi.modelcache.io``): kubelet hands a pod's ``csi`` volume to
the agent, which mounts the model's tree there read-only (DESIGN.md, "Handing a model to a
pod").

``service`` (gRPC edge: validate, call the core, map errors to codes) -> ``node`` (the core:
publish, unpublish, recover) with ``requests`` (validation), ``access`` (who the pod is, and
whether it may have the model), ``records`` (publishes on disk), ``mounts`` (the kernel's
mount table and bind mounts) and ``progress`` (what kubelet is told while it waits);
``server`` is the socket, ``plugin`` what the composition root runs, ``proto`` the CSI
messages generated from our ``csi.proto``.
"""
