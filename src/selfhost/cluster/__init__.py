"""selfhost past one machine: engine replicas on Ray Serve behind selfhost's own HTTP app.

config (ClusterConfig: replicas, autoscaling, CPU/GPU per replica, routing) ->
app (the Serve application: frontend -> replica xN, stats_board) -> launch
(`selfhost serve --ray`). prefix_table + router: prefix-aware routing;
remote_engine: the front end's LLM/AsyncEngine stand-ins; kuberay: the RayService
manifest. Ray is an optional extra (`pip install 'selfhost[ray]'`); only
config, prefix_table and kuberay import without it.
"""
