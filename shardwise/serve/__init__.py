"""`shardwise serve`: a finished run's model behind an HTTP(S) server with dynamic batching."""
