"""A slide's outputs, written by streaming nuclei chunk by chunk (no whole-slide list is held).

  nuclei.geojson   QuPath: FeatureCollection of detections (Polygon contour, classification name and
                   colour, measurements type_prob and area_um2, id = UUID of slide and nucleus)
  nuclei.json      HoVer-Net WSI layout: {"mag", "nuc": {"<n>": {bbox, centroid, contour, type,
                   type_prob}}} (ids 1..N in writing order)
  nuclei.parquet   one row per nucleus (PARQUET_COLUMNS)
  thumbnail.png    a low-resolution level with a dot per nucleus in its class colour

Coordinates are level-0 pixels (x right, y down; bbox as HoVer-Net: [[rmin, cmin], [rmax, cmax]]).
Each file grows under a temporary name and is renamed into place by `close`. Host only.
"""

import json
import os
import pathlib
import uuid

import cv2
import numpy as np

GEOJSON, JSON, PARQUET, THUMBNAIL = 'nuclei.geojson', 'nuclei.json', 'nuclei.parquet', 'thumbnail.png'
PARQUET_COLUMNS = ('id', 'x', 'y', 'bbox_x0', 'bbox_y0', 'bbox_x1', 'bbox_y1', 'area_um2', 'type',
                   'type_name', 'type_prob')
_NAMESPACE = uuid.UUID('6f1c8e52-3b0e-4d59-9a51-0d6b1f3e2a77')  # Fixed: ids are stable over releases.


def nucleus_id(slide_key: str, bbox) -> str:
  """UUID (version 5) of a nucleus: the slide's file fingerprint and its work-pixel bbox."""
  return str(uuid.uuid5(_NAMESPACE, f'{slide_key}:{",".join(str(int(v)) for v in bbox)}'))


def _coords(values: np.ndarray, f: float) -> list:
  """Work pixels to level-0 pixels: integers when the work image is level 0, else 2 decimals."""
  return np.asarray(values).tolist() if f == 1.0 else np.round(np.asarray(values) * f, 2).tolist()


def qupath_feature(fid: str, ring: list, name: str, colour, properties: dict) -> dict:
  """One QuPath detection: `ring` ([[x, y], ...], closed here) as a Polygon, its class name and
  RGB colour, then `properties` (tile mode: type_prob; slide mode: measurements)."""
  return {'type': 'Feature', 'id': fid,
          'geometry': {'type': 'Polygon', 'coordinates': [ring + [ring[0]]]},
          'properties': {'objectType': 'detection',
                         'classification': {'name': name, 'color': list(colour)}, **properties}}


def nucleus_entry(bbox: list, centroid: list, contour: list, nuc_type, type_prob) -> dict:
  """One nucleus of HoVer-Net's JSON layout: bbox [[rmin, cmin], [rmax, cmax]], centroid [x, y],
  contour [[x, y], ...], type id and type_prob."""
  return {'bbox': bbox, 'centroid': centroid, 'contour': contour, 'type': int(nuc_type),
          'type_prob': float(type_prob)}


class SlideWriters:
  """The four streamed outputs of one slide.

  Args:
    folder: the slide's output folder.
    table: (name, RGB colour) per type id.
    level0_per_px: level-0 pixels per work pixel; mpp: µm per work pixel.
    slide_key: the slide file's fingerprint (for the nucleus ids).
    magnification: the slide's objective power (nuclei.json "mag"), or None.
    thumbnail: RGB uint8 [h, w, 3] low-resolution image; thumb_per_level0: its px per level-0 px.
  """

  def __init__(self, folder: pathlib.Path, table, level0_per_px: float, mpp: float, slide_key: str,
               magnification, thumbnail: np.ndarray, thumb_per_level0: float):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.folder, self.table, self.f, self.mpp, self.key = folder, table, level0_per_px, mpp, slide_key
    self.thumbnail, self.thumb_f = np.ascontiguousarray(thumbnail.copy()), thumb_per_level0
    self.counts, self.n = np.zeros(len(table), np.int64), 0
    self._tmp = {name: folder / f'.{name}.tmp' for name in (GEOJSON, JSON, PARQUET)}
    self._geo = open(self._tmp[GEOJSON], 'w')
    self._geo.write('{"type": "FeatureCollection", "features": [')
    self._json = open(self._tmp[JSON], 'w')
    self._json.write(f'{{"mag": {json.dumps(magnification)}, "nuc": {{')
    self._schema = pa.schema([('id', pa.string()), ('x', pa.float64()), ('y', pa.float64()),
                              ('bbox_x0', pa.float64()), ('bbox_y0', pa.float64()),
                              ('bbox_x1', pa.float64()), ('bbox_y1', pa.float64()),
                              ('area_um2', pa.float64()), ('type', pa.int32()),
                              ('type_name', pa.string()), ('type_prob', pa.float64())])
    self._pa = pa
    self._parquet = pq.ParquetWriter(self._tmp[PARQUET], self._schema)

  def add(self, nuclei: dict) -> None:
    """Appends nuclei (work pixels; fields as `cohort.save_part` stores them)."""
    n = len(nuclei['type'])
    if not n:
      return
    f, ids = self.f, [nucleus_id(self.key, b) for b in nuclei['bbox']]
    centroid, bbox = nuclei['centroid'] * f, nuclei['bbox'] * f
    area = nuclei['area'] * self.mpp ** 2
    for k in range(n):
      t, sep = int(nuclei['type'][k]), ', ' if self.n + k else ''
      name, colour = self.table[t]
      ring = _coords(nuclei['contours'][k], f)
      feature = qupath_feature(ids[k], ring, name, colour, {'measurements': {
          'type_prob': float(nuclei['type_prob'][k]), 'area_um2': float(area[k])}})
      self._geo.write(sep + json.dumps(feature))
      b = nuclei['bbox'][k]
      nuc = nucleus_entry([_coords(b[:2], f), _coords(b[2:], f)],
                          _coords(nuclei['centroid'][k], f), ring, t, nuclei['type_prob'][k])
      self._json.write(f'{sep}"{self.n + k + 1}": {json.dumps(nuc)}')
      x, y = centroid[k] * self.thumb_f
      cv2.circle(self.thumbnail, (int(x), int(y)), 1, colour, -1)
    self._parquet.write_table(self._pa.table({
        'id': ids, 'x': centroid[:, 0], 'y': centroid[:, 1], 'bbox_x0': bbox[:, 1],
        'bbox_y0': bbox[:, 0], 'bbox_x1': bbox[:, 3], 'bbox_y1': bbox[:, 2], 'area_um2': area,
        'type': nuclei['type'].astype(np.int32), 'type_name': [self.table[int(t)][0] for t in
                                                               nuclei['type']],
        'type_prob': nuclei['type_prob'].astype(np.float64)}, schema=self._schema))
    np.add.at(self.counts, nuclei['type'].astype(np.int64), 1)
    self.n += n

  def close(self) -> None:
    """Finishes the files and renames them into place (the thumbnail too)."""
    self._geo.write(']}\n')
    self._json.write('}}\n')
    for f in (self._geo, self._json):
      f.flush()
      os.fsync(f.fileno())
      f.close()
    self._parquet.close()
    for name, tmp in self._tmp.items():
      os.replace(tmp, self.folder / name)
    write_png(self.folder / THUMBNAIL, self.thumbnail)

  def abort(self) -> None:
    for f in (self._geo, self._json):
      f.close()
    self._parquet.close()
    for tmp in self._tmp.values():
      tmp.unlink(missing_ok=True)


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
  """An RGB (or gray / bool) image as PNG, atomically."""
  from diffmix_jax import workdir as wdir  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  ok, png = cv2.imencode('.png', image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError(f'{path}: PNG encoding failed for an image of shape {image.shape}')
  wdir.atomic_write(path, png.tobytes())
