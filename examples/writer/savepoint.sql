BEGIN;
UPDATE orders SET status = 'shipped', version = version + 1 WHERE id = 'order-42';
SAVEPOINT before_event;
-- Fails with SQLSTATE 22023: "outbox_enqueue: aggregate_id must not be empty". From here on
-- Postgres refuses every statement of the transaction except a rollback...
SELECT outbox_enqueue('order', '', 'OrderShipped', '{"order_id": "order-42"}');
-- ... to the savepoint: the UPDATE stands, and the transaction goes on.
ROLLBACK TO SAVEPOINT before_event;
SELECT outbox_enqueue('order', 'order-42', 'OrderShipped', '{"order_id": "order-42"}');
COMMIT;
