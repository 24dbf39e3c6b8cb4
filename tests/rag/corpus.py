"""A small corpus on distinct topics, with one query per document that avoids copying its wording."""

DOCUMENTS = {
    "volcanoes": "Volcanoes form where molten rock, called magma, rises through the crust. "
    "When it erupts it becomes lava, and ash clouds can ground flights for days.",
    "sourdough": "Sourdough bread rises thanks to a starter of wild yeast and lactic acid bacteria. "
    "Bakers feed the starter with flour and water and let the dough ferment overnight.",
    "chess": "In chess the bishop moves diagonally and the knight jumps in an L shape. "
    "Castling moves the king two squares toward a rook.",
    "photosynthesis": "Plants convert sunlight, water and carbon dioxide into glucose and oxygen. "
    "Chlorophyll in the leaves absorbs mostly red and blue light.",
    "bees": "Honeybees communicate the location of flowers with a waggle dance. "
    "A colony has one queen, thousands of female workers and a few male drones.",
    "tides": "Ocean tides are caused by the gravitational pull of the moon and the sun. "
    "Most coasts see two high tides and two low tides each day.",
    "espresso": "Espresso is brewed by forcing hot water through finely ground coffee at high pressure. "
    "A good shot has a layer of golden crema on top.",
    "black_holes": "A black hole is a region where gravity is so strong that not even light escapes. "
    "Its boundary is called the event horizon.",
    "vaccines": "Vaccines train the immune system to recognise a pathogen without causing the disease. "
    "They prompt the body to make antibodies and memory cells.",
    "bicycles": "To fix a flat bicycle tyre, remove the wheel, lever off the tyre and patch the inner tube. "
    "Pump it back to the pressure printed on the sidewall.",
    "tax_returns": "Freelancers must file a tax return each year declaring their income and deductible expenses. "
    "Missing the filing deadline usually means a late penalty.",
    "python_lists": "In Python a list is a mutable sequence; append adds an item at the end and sort orders it in place. "
    "Tuples are the immutable counterpart.",
    "marathon": "Marathon runners train for months, building weekly mileage and a long run. "
    "The race distance is 42.195 kilometres.",
    "origami": "Origami is the Japanese art of folding paper into shapes such as cranes, without cutting or glue.",
    "glaciers": "Glaciers are slow rivers of ice that carve U-shaped valleys. "
    "Warming climates make many of them retreat every summer.",
    "jazz": "Jazz grew in New Orleans from blues and ragtime; improvisation and swing rhythm define it. "
    "Louis Armstrong was an early trumpet star.",
    "knitting": "Knitting uses two needles to loop yarn into rows of stitches; the basic stitches are knit and purl.",
    "tcp": "TCP opens a connection with a three-way handshake: SYN, SYN-ACK, ACK. "
    "It retransmits lost packets so data arrives complete and in order.",
    "roman_empire": "The Western Roman Empire fell in 476 when the Germanic leader Odoacer deposed the emperor Romulus Augustulus.",
    "sleep": "Adults need seven to nine hours of sleep. Deep sleep and REM sleep alternate in cycles of about ninety minutes.",
    "composting": "Composting turns kitchen scraps and garden waste into humus. "
    "Mix green nitrogen-rich material with brown carbon-rich material and keep the heap moist.",
    "earthquakes": "Earthquakes happen when stress along a fault is suddenly released. "
    "Seismographs record the waves and the magnitude scale measures the energy.",
    "wine": "Red wine gets its colour from fermenting the juice with grape skins; tannins give it a dry taste.",
    "solar_panels": "Solar panels use photovoltaic cells of silicon to turn light into electricity. "
    "An inverter converts the direct current to alternating current for the house.",
    "penguins": "Emperor penguins breed in the Antarctic winter; the male keeps the egg warm on his feet for two months.",
    "mortgages": "A mortgage is a loan secured on a house; monthly repayments cover interest and part of the principal.",
    "guitar": "A standard guitar has six strings tuned E A D G B E. Chords are formed by pressing strings against frets.",
    "recycling_glass": "Glass can be recycled endlessly: it is crushed into cullet, melted and blown into new bottles.",
    "dinosaurs": "Dinosaurs went extinct about 66 million years ago, most likely after an asteroid struck near Yucatan.",
    "password_security": "Strong passwords are long and unique; a password manager and two-factor authentication protect accounts.",
}

# query -> the document that answers it
QUERIES = {
    "how does lava come out of a mountain": "volcanoes",
    "how do I make bread with wild yeast": "sourdough",
    "which piece moves diagonally on the board": "chess",
    "how do leaves turn light into sugar": "photosynthesis",
    "how do bees tell each other where food is": "bees",
    "why does the sea level rise and fall twice daily": "tides",
    "how is a strong coffee shot made under pressure": "espresso",
    "what is the event horizon": "black_holes",
    "how does immunisation protect against illness": "vaccines",
    "repairing a punctured bike wheel": "bicycles",
    "self-employed income declaration deadline": "tax_returns",
    "how to add an element to a mutable sequence in python": "python_lists",
    "how long is the long distance running race": "marathon",
    "folding paper cranes": "origami",
    "rivers of ice carving valleys": "glaciers",
    "improvised music from New Orleans": "jazz",
    "knit and purl stitches with yarn": "knitting",
    "three-way handshake of the transmission protocol": "tcp",
    "when did Rome fall to Odoacer": "roman_empire",
    "how many hours of rest does a grown-up need each night": "sleep",
    "turning food scraps into garden soil": "composting",
    "what does a seismograph measure": "earthquakes",
    "why is red wine dry and dark": "wine",
    "photovoltaic electricity for my home": "solar_panels",
    "which bird incubates eggs on its feet in Antarctica": "penguins",
    "home loan monthly repayments and interest": "mortgages",
    "tuning the six strings of a guitar": "guitar",
    "what happens to bottles in the recycling bin": "recycling_glass",
    "what killed the dinosaurs": "dinosaurs",
    "how to keep online accounts safe": "password_security",
}


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCUMENTS.items():
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder
