"""The public API is exactly what astra/__init__.py lists (STYLE.md section 2)."""

from __future__ import annotations

import astra
import ipc


def test_astra_exports_are_locked():
    assert astra.__all__ == sorted(astra.__all__)
    assert set(astra.__all__) == {
        "Agent",
        "AgentRef",
        "AstraError",
        "AstraInternalError",
        "CapabilityError",
        "Client",
        "CycleError",
        "Future",
        "Graph",
        "Kernel",
        "KernelNotRunningError",
        "Memory",
        "Node",
        "RemoteError",
        "SerializationError",
        "TaskTimeoutError",
        "TooManyClientsError",
        "UpstreamError",
        "WorkerCrashedError",
        "__version__",
        "cancelled",
        "connect",
        "errors",
        "memory",
        "plugin",
        "tool",
    }
    for name in astra.__all__:
        assert hasattr(astra, name)


def test_public_errors_claim_the_astra_module():
    assert astra.AstraError.__module__ == "astra"
    assert astra.Kernel.__module__ == "astra"
    assert astra.WorkerCrashedError.__module__ == "astra"
    assert issubclass(astra.AstraInternalError, astra.AstraError)


def test_ipc_exports_exist():
    for name in ipc.__all__:
        assert hasattr(ipc, name), name


def test_sandbox_exports_exist_and_are_sorted():
    import sandbox

    assert sandbox.__all__ == sorted(sandbox.__all__)
    for name in sandbox.__all__:
        assert hasattr(sandbox, name), name
    assert issubclass(sandbox.SandboxTimeout, sandbox.SandboxError)


def test_kernel_exports_exist():
    import kernel

    for name in kernel.__all__:
        assert hasattr(kernel, name), name


def test_plugin_and_memory_namespaces():
    import astra.plugin

    for name in astra.plugin.__all__:
        assert hasattr(astra.plugin, name), name
    assert astra.Memory is astra.memory.Memory
    assert astra.Memory.__module__ == "astra.memory"
    assert issubclass(astra.errors.ServiceNotFoundError, astra.errors.PluginError)
    assert issubclass(astra.errors.DimensionMismatchError, astra.errors.MemoryStoreError)
