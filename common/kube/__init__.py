"""The Kubernetes side both programs share: ``client`` (configuration, the API calls, the
one import of kubernetes_asyncio), ``informer`` (list, watch, relist on 410), ``errors``
(what a refusal means), ``settings``."""
