"""modelcache webhook: mutating admission that mounts cached models into pods."""
