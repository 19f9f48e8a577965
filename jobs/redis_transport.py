"""kombu's Redis transport for the API's publishing side, with one redis-py client per channel.

kombu's Redis channel builds a new `redis.Redis` client for every command it sends outside its
consumer loop, so every published task pays for a client whose constructor fills a
case-insensitive table of ~170 response callbacks, a large part of a Celery `send_task`. This
channel builds that client once and reuses it; redis-py clients are thread-safe and all of them
share the channel's connection pool anyway, so the commands, the connections and the messages
are exactly kombu's.

Only the publishing side uses it (`jobs.queue.JobQueue`); workers consume with the stock
transport.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis


class PublishChannel(kombu_redis.Channel):
    _publish_client = None

    def _create_client(self, asynchronous: bool = False):
        if asynchronous:  # the consumer loop's client: kombu already keeps one
            return super()._create_client(asynchronous=True)
        client = self._publish_client
        if client is None or client.connection_pool is not self.pool:  # the pool is replaced after a fork
            client = self._publish_client = super()._create_client()
        return client


class PublishTransport(kombu_redis.Transport):
    Channel = PublishChannel
