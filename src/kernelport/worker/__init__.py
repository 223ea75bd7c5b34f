"""The worker process: model instances outside the server, fed through shared memory."""
