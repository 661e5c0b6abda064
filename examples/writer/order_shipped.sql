-- Ship an order and write its event in the same transaction (psql, or any client and language).
BEGIN;
UPDATE orders SET status = 'shipped', version = version + 1 WHERE id = 'order-42';
SELECT outbox_enqueue(
    aggregate_type => 'order',
    aggregate_id   => 'order-42',
    event_type     => 'OrderShipped',
    payload        => '{"order_id": "order-42", "carrier": "DHL"}',
    headers        => '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'
);
COMMIT;
