"""How KV bytes get from the store that holds them into a decode node (see ``pdgrpc.transfer.base``)."""
