-- Calls handled by the agent, and callback requests taken after hours.

CREATE TABLE IF NOT EXISTS calls (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    call_sid        text NOT NULL UNIQUE,
    direction       text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    scenario        text NOT NULL DEFAULT 'inbound'
                    CHECK (scenario IN ('inbound', 'service_due', 'confirmation')),
    customer_id     bigint REFERENCES customers (id) ON DELETE SET NULL,
    verified        boolean NOT NULL DEFAULT false,
    outcome         text CHECK (outcome IN ('booked', 'rescheduled', 'cancelled', 'confirmed',
                        'transferred', 'info', 'callback_requested', 'abandoned', 'failed',
                        'voicemail', 'opted_out')),
    twilio_status   text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz,
    transcript      jsonb NOT NULL DEFAULT '[]'::jsonb,
    turn_metrics    jsonb NOT NULL DEFAULT '[]'::jsonb,
    summary         text,
    appointment_ids bigint[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE INDEX IF NOT EXISTS calls_customer_idx ON calls (customer_id, started_at DESC);
CREATE INDEX IF NOT EXISTS calls_started_idx ON calls (started_at DESC);

-- Twilio status callbacks, recorded idempotently (Twilio retries them).
CREATE TABLE IF NOT EXISTS call_status_events (
    call_sid        text NOT NULL,
    call_status     text NOT NULL,
    sequence_number integer NOT NULL DEFAULT 0,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_sid, call_status, sequence_number)
);

CREATE TABLE IF NOT EXISTS callback_requests (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    call_sid     text NOT NULL,
    customer_id  bigint REFERENCES customers (id) ON DELETE SET NULL,
    phone        text CHECK (phone IS NULL OR phone ~ '^\+[1-9][0-9]{7,14}$'),
    reason       text NOT NULL,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'cancelled')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    handled_at   timestamptz,
    UNIQUE (call_sid)
);
CREATE INDEX IF NOT EXISTS callback_requests_open_idx ON callback_requests (requested_at)
    WHERE status = 'open';
