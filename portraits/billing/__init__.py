"""Orders, payments and refunds. The order id is the idempotency key everywhere.

Payment callbacks, the reconciliation job and the refund job all end in the same functions,
`payments.apply_payment` and `refunds.apply_refund_result`, whose effects happen only when a compare-and-set on the
order (or on one refund entry of it) wins. That is what holds on a real MongoDB; a per-order Redis lock
(`locks.order_lock`) additionally serialises the money paths of one order, because in-process mongomock does not
make find-and-modify atomic across threads.

The modules, each importing only those above it:
- `alerts`: what operators must look at (payment_alerts). `locks`: the per-order lock.
- `refunds`: requesting, submitting and settling refunds. It knows nothing of payments, orders or avatars (they
  call it), so `portraits.avatars` and `portraits.privacy` can ask for a refund without an import cycle.
- `payments`: applying a transaction to an order, which starts the avatar's training.
- `orders`: creating, expiring and closing orders; fulfilment.
- `reconcile`: the periodic catch-up with WeChat Pay, through the functions above.

Rules decided here:
- An unpaid order expires `order_expire_s` after creation: it is closed at WeChat Pay first, then here, which frees
  the avatar for a new order. If WeChat Pay says it was paid meanwhile, the payment is applied instead.
- Refunds: at most one refund is in flight per order (state `refunding`). A refund that settles SUCCESS ends the
  order `refunded` when everything paid has been refunded, else (a partial refund) returns it to `paid`/`fulfilled`.
  A refund that ends ABNORMAL, CLOSED or `rejected` (refused by WeChat Pay outright) moves the order to
  `refund_failed` and raises a payment alert; a CLOSED one is retried automatically under the next refund number
  (up to `refund_closed_retries` times). ABNORMAL and rejected ones wait for an operator, who requests again with
  expect=("refund_failed",). If WeChat Pay's record later shows a `rejected` refund succeeded after all, the order
  settles from `refund_failed` as it would have from `refunding`.
- Undeliverable: a paid order that was never fulfilled and whose renders failed (after their retries)
  `undeliverable_failed_renders` times is refunded in full.
"""
