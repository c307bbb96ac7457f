"""G.711 mu-law helpers and synthetic telephone audio (stdlib + numpy, no ``audioop``)."""

from __future__ import annotations

import itertools

import numpy as np

SAMPLE_RATE = 8000
"""Telephone sample rate in Hz."""

_BIAS = 0x84
_CLIP = 32635


def pcm16_to_ulaw(pcm: bytes) -> bytes:
    """Encodes little-endian signed 16-bit PCM as G.711 mu-law.

    Args:
        pcm: Little-endian int16 samples.

    Returns:
        One mu-law byte per sample.
    """
    x = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    mag = np.minimum(np.abs(x), _CLIP) + _BIAS
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    exponent = np.clip(exponent, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    ulaw = ~(sign | (exponent << 4) | mantissa) & 0xFF
    return ulaw.astype(np.uint8).tobytes()


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    """Decodes G.711 mu-law to little-endian signed 16-bit PCM.

    Args:
        ulaw: mu-law bytes.

    Returns:
        Two bytes (int16 LE) per input byte.
    """
    u = ~np.frombuffer(ulaw, dtype=np.uint8).astype(np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -mag, mag).astype("<i2").tobytes()


def pcm16_to_alaw(pcm: bytes) -> bytes:
    """Encodes little-endian signed 16-bit PCM as G.711 A-law.

    Args:
        pcm: Little-endian int16 samples.

    Returns:
        One A-law byte per sample.
    """
    x = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    x = np.where(x >= 0, x, -x - 1)
    seg_ends = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    seg = np.searchsorted(seg_ends, x)
    shift = np.where(seg < 2, 1, np.maximum(seg, 1))
    aval = (np.minimum(seg, 7) << 4) | ((x >> shift) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, aval)
    return (aval ^ mask).astype(np.uint8).tobytes()


def alaw_to_pcm16(alaw: bytes) -> bytes:
    """Decodes G.711 A-law to little-endian signed 16-bit PCM.

    Args:
        alaw: A-law bytes.

    Returns:
        Two bytes (int16 LE) per input byte.
    """
    a = np.frombuffer(alaw, dtype=np.uint8).astype(np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype("<i2").tobytes()


def decode_to_pcm16(audio: bytes, encoding: str) -> bytes:
    """Decodes Deepgram-style encoded audio to int16 PCM.

    Args:
        audio: Encoded audio.
        encoding: "linear16", "mulaw" or "alaw" (anything else is treated as linear16).

    Returns:
        Little-endian int16 samples.
    """
    if encoding == "mulaw":
        return ulaw_to_pcm16(audio)
    if encoding == "alaw":
        return alaw_to_pcm16(audio)
    return audio


def encode_pcm16(pcm: bytes, encoding: str) -> bytes:
    """Encodes int16 PCM as Deepgram-style audio.

    Args:
        pcm: Little-endian int16 samples.
        encoding: "linear16", "mulaw" or "alaw" (anything else is treated as linear16).

    Returns:
        The encoded audio.
    """
    if encoding == "mulaw":
        return pcm16_to_ulaw(pcm)
    if encoding == "alaw":
        return pcm16_to_alaw(pcm)
    return pcm


def pcm16_rms(pcm: bytes) -> float:
    """Root-mean-square level of int16 PCM, in sample units (0..32768).

    Args:
        pcm: Little-endian int16 samples.

    Returns:
        The RMS level; 0.0 for empty input.
    """
    x = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float64)
    if x.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(x * x)))


# Formants (F1, F2, F3) of common English vowels, in Hz.
_VOWELS = (
    (730.0, 1090.0, 2440.0),
    (270.0, 2290.0, 3010.0),
    (530.0, 1840.0, 2480.0),
    (660.0, 1720.0, 2410.0),
    (570.0, 840.0, 2410.0),
    (440.0, 1020.0, 2240.0),
    (300.0, 870.0, 2240.0),
    (640.0, 1190.0, 2390.0),
    (490.0, 1350.0, 1690.0),
)
_BANDWIDTHS = (90.0, 120.0, 180.0)


def speech_pcm16(
    seconds: float, freq: float = 220.0, sample_rate: int = SAMPLE_RATE, seed: int = 0
) -> bytes:
    """Synthesises a voiced, speech-like signal as int16 PCM.

    Additive synthesis of a harmonic series on a falling, wobbling fundamental, shaped by
    three formants that glide between random vowels, cut into syllables of 160-300 ms,
    each with a short fricative (noise) onset. Silero VAD rates it as speech (> 0.9).

    Args:
        seconds: Duration.
        freq: Fundamental frequency in Hz (110 male-ish, 220 female-ish).
        sample_rate: Output sample rate in Hz.
        seed: Seed for syllable lengths, vowels and noise (output is deterministic).

    Returns:
        Little-endian int16 samples, peaking at 60 % of full scale.
    """
    n = round(seconds * sample_rate)
    if n <= 0:
        return b""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(bounds[-1] + int(rng.uniform(0.16, 0.30) * sample_rate))
    bounds[-1] = n
    formants = np.zeros((3, n))
    env = np.zeros(n)
    noise_env = np.zeros(n)
    prev = _VOWELS[int(rng.integers(len(_VOWELS)))]
    for a, b in itertools.pairwise(bounds):
        vowel = _VOWELS[int(rng.integers(len(_VOWELS)))]
        length = b - a
        glide = np.clip(np.linspace(0.0, 1.0, length) / 0.3, 0.0, 1.0)
        for i in range(3):
            formants[i, a:b] = prev[i] + (vowel[i] - prev[i]) * glide
        prev = vowel
        onset = min(length - 1, int(0.04 * sample_rate * rng.uniform(0.5, 1.5)))
        ramp = np.clip((np.arange(length) - onset) / (length - onset), 0.0, 1.0)
        env[a:b] = np.sin(np.pi * ramp) ** 0.6 * rng.uniform(0.6, 1.0)
        noise_env[a : a + onset] = rng.uniform(0.05, 0.25)
    f0 = (
        freq
        * (1.1 - 0.2 * t / seconds)
        * (1 + 0.05 * np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)))
    )
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    sig = np.zeros(n)
    for k in range(1, int(sample_rate / 2 / (freq * 0.9))):
        fk = k * f0
        gain = 0.15 / k + sum(
            np.exp(-0.5 * ((fk - formants[i]) / _BANDWIDTHS[i]) ** 2) * (1.0 if i == 0 else 0.6)
            for i in range(3)
        )
        gain = gain * (fk < sample_rate / 2 * 0.95)
        sig += gain * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    sig *= env
    sig /= float(np.max(np.abs(sig))) or 1.0
    sig += noise_env * np.diff(rng.standard_normal(n), prepend=0.0) * 0.5
    sig += 0.003 * rng.standard_normal(n)
    sig /= float(np.max(np.abs(sig))) or 1.0
    return (sig * 0.6 * 32767).astype("<i2").tobytes()


def speech_ulaw(seconds: float, freq: float = 220.0, seed: int = 0) -> bytes:
    """Speech-like audio as 8 kHz mu-law (loud enough for Silero VAD).

    Args:
        seconds: Duration.
        freq: Fundamental frequency in Hz.
        seed: Seed for the small random jitter.

    Returns:
        mu-law bytes, 8000 per second.
    """
    return pcm16_to_ulaw(speech_pcm16(seconds, freq=freq, seed=seed))


def silence_ulaw(seconds: float) -> bytes:
    """Digital silence as 8 kHz mu-law (0xFF encodes 0).

    Args:
        seconds: Duration.

    Returns:
        mu-law bytes, 8000 per second.
    """
    return b"\xff" * round(seconds * SAMPLE_RATE)


def line_noise_ulaw(seconds: float, *, dbfs: float, seed: int = 0) -> bytes:
    """White noise at ``dbfs`` (RMS, dB below full scale) as 8 kHz mu-law: a phone line's
    idle hiss (around -60 dBFS on a quiet line, -50 on a noisy one).

    Args:
        seconds: Duration.
        dbfs: RMS level in dBFS (negative).
        seed: Seed of the noise.

    Returns:
        mu-law bytes, 8000 per second.
    """
    rms = 32768.0 * 10 ** (dbfs / 20)
    noise = np.random.default_rng(seed).normal(0.0, rms, round(seconds * SAMPLE_RATE))
    return pcm16_to_ulaw(np.clip(noise, -32768, 32767).astype("<i2").tobytes())


def silence_pcm16(seconds: float, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Digital silence as int16 PCM.

    Args:
        seconds: Duration.
        sample_rate: Sample rate in Hz.

    Returns:
        Zero bytes, two per sample.
    """
    return b"\x00\x00" * round(seconds * sample_rate)
