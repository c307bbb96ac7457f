-- What a service department expects on the phone: warm transfers, call recording,
-- answering-machine detection, languages and structured call summaries.
--
-- customers.do_not_record: the customer asked not to be recorded; no call of theirs is
--   recorded (checked before a recording starts and when they are identified mid-call).
-- calls: the call's language, the answering-machine verdict (Twilio async AMD), the warm
--   transfer (reason, whisper said to the advisor, how the dial ended), the recording
--   (Twilio Recording SID, status, duration, media URL) and the structured summary.
-- callback_requests.summary: the call summary the advisor reads before calling back.

ALTER TABLE customers
    ADD COLUMN IF NOT EXISTS do_not_record boolean NOT NULL DEFAULT false;

ALTER TABLE calls
    ADD COLUMN IF NOT EXISTS language text NOT NULL DEFAULT 'en'
        CHECK (language ~ '^[a-z]{2}$'),
    ADD COLUMN IF NOT EXISTS answered_by text
        CHECK (answered_by IN ('human', 'machine_start', 'machine_end_beep',
                               'machine_end_silence', 'machine_end_other', 'fax', 'unknown')),
    ADD COLUMN IF NOT EXISTS transfer_reason text CHECK (length(transfer_reason) <= 500),
    ADD COLUMN IF NOT EXISTS transfer_whisper text CHECK (length(transfer_whisper) <= 600),
    ADD COLUMN IF NOT EXISTS transfer_number text
        CHECK (transfer_number ~ '^\+[1-9][0-9]{7,14}$'),
    ADD COLUMN IF NOT EXISTS transfer_status text
        CHECK (transfer_status IN ('dialing', 'whispered', 'connected', 'no-answer', 'busy',
                                   'failed', 'canceled')),
    ADD COLUMN IF NOT EXISTS transfer_started_at timestamptz,
    ADD COLUMN IF NOT EXISTS transfer_finished_at timestamptz,
    ADD COLUMN IF NOT EXISTS transfer_dial_call_sid text
        CHECK (transfer_dial_call_sid ~ '^CA[0-9a-fA-F]{32}$'),
    ADD COLUMN IF NOT EXISTS recording_sid text CHECK (recording_sid ~ '^RE[0-9a-fA-F]{32}$'),
    ADD COLUMN IF NOT EXISTS recording_status text
        CHECK (recording_status IN ('in-progress', 'paused', 'stopped', 'completed', 'absent',
                                    'failed')),
    ADD COLUMN IF NOT EXISTS recording_duration_secs integer
        CHECK (recording_duration_secs >= 0),
    ADD COLUMN IF NOT EXISTS recording_url text CHECK (length(recording_url) <= 500),
    ADD COLUMN IF NOT EXISTS recording_channels smallint CHECK (recording_channels IN (1, 2)),
    ADD COLUMN IF NOT EXISTS summary_data jsonb,
    ADD COLUMN IF NOT EXISTS summary_source text CHECK (summary_source IN ('template', 'llm'));

CREATE UNIQUE INDEX IF NOT EXISTS calls_recording_sid_key ON calls (recording_sid)
    WHERE recording_sid IS NOT NULL;

ALTER TABLE callback_requests
    ADD COLUMN IF NOT EXISTS summary text CHECK (length(summary) <= 2000);

-- A call a machine answered stays a voicemail, and a transfer nobody picked up stays a
-- callback request, whichever writer (the media stream ending, a Twilio callback) comes
-- last: the outcome follows the facts Twilio reported.
CREATE OR REPLACE FUNCTION calls_outcome_follows_twilio() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.answered_by IN ('machine_end_beep', 'machine_end_silence', 'machine_end_other') THEN
        NEW.outcome := 'voicemail';
    ELSIF NEW.transfer_status IN ('no-answer', 'busy', 'failed', 'canceled') THEN
        NEW.outcome := 'callback_requested';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS calls_outcome_follows_twilio ON calls;
CREATE TRIGGER calls_outcome_follows_twilio BEFORE INSERT OR UPDATE ON calls
    FOR EACH ROW EXECUTE FUNCTION calls_outcome_follows_twilio();
