"""One camera, several viewers: a frame topic in shared memory.

Run it and it starts a publisher of synthetic 480x640 RGB frames and three
viewer processes that read every frame in place (zero copy) and report
their frame rate.  With overflow="overwrite" the camera never waits for a
slow viewer: a viewer that falls a ring behind is told how many frames it
missed and goes on from the oldest frame still there.

    python examples/camera.py [seconds]
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import numpy as np

import shmkit

SHAPE = (480, 640, 3)
FRAME = int(np.prod(SHAPE))


def viewer(topic: shmkit.Topic, k: int, seconds: float, slow: bool) -> None:
    frames = missed = 0
    checksum = 0
    end = time.monotonic() + seconds
    with topic.subscribe() as sub:
        while time.monotonic() < end:
            try:
                with sub.recv_view(timeout=1.0) as mv:
                    img = np.frombuffer(mv, np.uint8).reshape(SHAPE)
                    checksum += int(img[0, 0, 0])  # look at the frame in place
                    del img
            except shmkit.MessagesLost as e:
                missed += e.missed
                continue
            except shmkit.Timeout:
                break
            frames += 1
            if slow:
                time.sleep(0.02)  # a viewer that cannot keep up
    print(f"viewer {k}: {frames / seconds:7.1f} frames/s, {missed} missed"
          f"{' (slow on purpose)' if slow else ''}")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    topic = shmkit.Topic(None, capacity=8 * (FRAME + 64), overflow="overwrite")
    ctx = multiprocessing.get_context("spawn")
    viewers = [ctx.Process(target=viewer, args=(topic, k, seconds, k == 2))
               for k in range(3)]
    for p in viewers:
        p.start()
    while len(topic.statistics()["subscribers"]) < len(viewers):
        time.sleep(0.01)
    frame = np.zeros(SHAPE, np.uint8)
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        frame[0, 0, 0] = sent % 256
        topic.publish(frame)
        sent += 1
        time.sleep(0.002)  # a camera at a few hundred frames per second
    for p in viewers:
        p.join()
    print(f"camera: {sent / seconds:7.1f} frames/s published")
    topic.close()


if __name__ == "__main__":
    main()
